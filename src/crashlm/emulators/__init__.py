"""Emulators: layer plans, strategies, building, bundles, adapters and plug-in."""
