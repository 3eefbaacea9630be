"""PET types, one module each (``registry.py`` lists them): each converts a TenantDelta into its
tensor layout and applies its delta to its own rows at the encoder hooks it registered."""
