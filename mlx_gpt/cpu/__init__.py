"""The Linux CPU plug-in (placeholder while the core is split out; see the issue on the clean core)."""
