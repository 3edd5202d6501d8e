"""Mechanisms on disk that several layers share: blobs, migrations, SQL, private files.

``blobstore`` (the one content-addressed store), ``migrations`` (the one versioned,
transactional runner), ``sql`` (one connection over SQLite or PostgreSQL), ``database_url``
(recognising and redacting ``postgresql://`` URLs), ``private`` (0600/0700 whatever the umask).
"""
