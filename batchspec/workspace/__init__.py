"""The workspace on disk: project file, manifests, YAML positions, templates, caches."""
