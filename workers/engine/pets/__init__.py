"""PET types: each converts a TenantDelta into slot tensors and applies its delta to its own rows."""
