"""The hub's side of Flower's Deployment Engine: the SuperLink, the FAB, runs, the ServerApp."""
