"""Demo model, parallel plan and data for ce_guard examples: a user of the library, never a dependency."""
