"""PET type names shared by the wire-free contracts (database rows, adapter layout)."""

PET_TYPES = ("lora", "adapter", "bitfit", "ia3", "diff", "maskbert")
