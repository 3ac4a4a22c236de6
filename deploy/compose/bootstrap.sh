#!/bin/sh
# The compose federation's one-shot bootstrap (the `bootstrap` service of compose.yaml):
# synthetic OMOP data for the four regions, then the federation's CA, every certificate,
# hub.toml and the node.toml files (`chc federation init`), adapted to the containers' paths.
# It runs as the image's user (uid 10001) and does nothing on a federation that exists
# already, so `docker compose up` may run it again: it never replaces a CA or a key.
#
#   CHC_FEDERATION  where the PKI goes (a bind mount: the compose folder's ./federation)
#   CHC_OMOP        where the synthetic OMOP tables go (the `omop` volume)
#   CHC_PERSONS     persons per region (default 20000)
#   CHC_HUB         HOST:PORT analysts use to reach the hub (on its certificate)
#
# In a real federation the CA lives on an offline machine and each custodian's node uses
# its own data: this script is for the demonstration federation only (docs/deployment.md).
set -eu

FED="${CHC_FEDERATION:?set CHC_FEDERATION to the folder for the PKI}"
OMOP="${CHC_OMOP:?set CHC_OMOP to the folder for the synthetic OMOP tables}"
PERSONS="${CHC_PERSONS:-20000}"
HUB="${CHC_HUB:-hub:50050}"
REGIONS="nenc nwc yh gm"
PKI="$FED/pki"

if [ -f "$PKI/ca.pem" ]; then
    echo "bootstrap: $PKI/ca.pem exists: the federation is already set up; nothing to do"
    exit 0
fi
umask 077

nodes=""
for region in $REGIONS; do
    if [ ! -f "$OMOP/$region/person.parquet" ]; then
        chc synth --region "$region" --persons "$PERSONS" --out "$OMOP/$region"
    fi
    # Each node is its compose service: the hub dials REGION:50051 on the compose network.
    nodes="$nodes --node $region=$OMOP/$region@$region:50051"
done
# shellcheck disable=SC2086 # $nodes is a list of options, split on purpose
chc federation init "$PKI" --hub "$HUB" --hub-host hub $nodes

for region in $REGIONS; do
    toml="$PKI/node/$region/node.toml"
    # The containers' paths: the ledger and its key on the node's volume (/var/lib/chc),
    # the CRL in the read-only crl folder. Top-level keys, so inserted before any table.
    sed -i "/^name = /a\\
ledger = \"/var/lib/chc/$region.ledger.sqlite\"   # the node's volume: durable, fsync honoured\\
crl = \"/etc/chc/crl/crl.pem\"   # absent until the first \`chc pki revoke\`: nothing revoked" \
        "$toml"
done
sed -i "/^listen = /a\\
crl = \"/etc/chc/crl/crl.pem\"   # absent until the first \`chc pki revoke\`: nothing revoked" \
    "$PKI/hub/hub/hub.toml"
# Where `chc pki revoke` output is published to every service (copied there, docs/deployment.md).
mkdir -p "$FED/crl"

echo "bootstrap: federation ready in $PKI (keep ca.key offline in a real federation)"
