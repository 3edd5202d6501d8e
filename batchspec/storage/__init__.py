"""Mechanisms on disk that several layers share: content-addressed blobs, versioned migrations."""
