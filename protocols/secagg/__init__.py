"""Secure aggregation: the hub learns the sum of the nodes' vectors and nothing else.

Built on the federation PKI (protocols.security) and the distributed discrete Gaussian
(queries.distributed_noise), in three parts that build on one another: `ring` holds vectors
of 64-bit integers in Z_2^64; `keys` makes each node's fresh per-query X25519 key and the
announcement that binds it, signed, to the node and the query; `masks` derives the pairwise
masks from those keys, masks a node's vector and unmasks the sum. The protocol, its threat
model and what it does not do are in docs/secure-aggregation.md. Import each name from the
module that defines it.
"""
