"""Server plumbing shared by every service: lifecycle, health, errors, paths, caches, scale-out."""
