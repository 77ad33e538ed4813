"""genloom's servers: one package per service, the shared plumbing in `server`, model resolution in `models`."""
