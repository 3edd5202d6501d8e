"""The face: click commands, rendering (text, markdown, JSON), progress.

The only layer that knows click or a terminal; nothing imports it.
"""
