"""A node's side of Flower's Deployment Engine: the SuperNode, the FAB check, the ClientApp."""
