"""Interop: clients in other languages (Node.js) that know nothing but protos/."""
