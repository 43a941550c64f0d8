"""The core a researcher extends: models and their capabilities (JAX and Equinox only)."""
