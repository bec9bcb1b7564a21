"""Base models: loading (packaged default, local path, hub id), target names per architecture, presets."""
