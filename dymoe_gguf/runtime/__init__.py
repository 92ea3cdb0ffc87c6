"""The runtime: observe routing, decide tiers, apply views and paging."""
