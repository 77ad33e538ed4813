"""Plumbing every genloom server shares: settings, errors, interceptors, the grpc.aio server and its lifecycle."""
