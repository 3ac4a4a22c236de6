"""`chc ui`: the analyst's and auditor's local web dashboard (docs/ui.md).

A FastAPI app served on 127.0.0.1 only, behind a random token, that acts with the user's own
identity: every query it runs is signed on this machine by coordinator.analyst.client, and no
key ever leaves it. app.py holds the routes, auth.py the token and Origin checks, history.py
the local store of past queries, models and comparisons, models.py and model_charts.py the
Models page (forms to specs, coefficient and O/E tables, forest and funnel plots), audit.py
what the Audit page reads from the ledgers.
"""
