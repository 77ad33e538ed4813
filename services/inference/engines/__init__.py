"""Engine implementations. Import the one you need; `create_engine()` picks by GENLOOM_ENGINE."""
