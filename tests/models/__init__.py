"""Model resolution, model paths and typed settings."""
