"""The rows of the known model's pathway view, read as a node builds them (for pooled fits)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from coordinator.local import synth
from coordinator.local.federation import LocalFederation
from node.data.store import OmopStore
from queries.pathway import Pathway, load_pathways


def known_pathway() -> Pathway:
    """The pathway the synthetic known model is defined on."""
    (pathway,) = load_pathways([synth.KNOWN_PATHWAY])
    return pathway


def known_rows(
    folder: Path, care_sites: tuple[str, ...] = (), *, person_id: bool = False
) -> pa.Table:
    """One region's pathway rows with the model's columns, from the node's own store.

    With care_sites (the codes the node declares), also each person's `care_site`; with
    person_id, the identifier (for a gradient fit's hold-out rule).
    """
    store = OmopStore(
        folder,
        [known_pathway()],
        reference_date=LocalFederation.reference_date,
        imd_lookup=folder / synth.LOOKUP_FILE,
        recheck_s=None,
        care_sites=care_sites,
    )
    site = ", CAST(care_site AS VARCHAR) AS care_site" if care_sites else ""
    site += ", person_id" if person_id else ""
    try:
        return store.query(
            f"""
            SELECT CAST(age_band AS VARCHAR) AS age_band, age, CAST(sex AS VARCHAR) AS sex,
                   CAST(imd_quintile AS VARCHAR) AS imd_quintile,
                   CAST(deceased AS VARCHAR) AS deceased,
                   CAST(admitted AS VARCHAR) AS admitted{site}
            FROM {synth.KNOWN_PATHWAY}
            """  # noqa: S608 - constants
        )
    finally:
        store.close()
