"""Federation security, in three parts that build on one another.

`pki` is the federation's certificate authority, the identities it issues and the roles and
names their certificates carry; `tls` authenticates connections between parties with those
identities (mutual TLS); `envelope` holds the analyst-signed query envelopes, which
authenticate an analyst's query end to end, whoever relays it. Import each name from the
module that defines it.
"""
