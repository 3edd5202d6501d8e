"""Formats both sides of a Batch API share: request lines, result lines, dialect mappings.

``inputs`` (batch input lines and their validation), ``anthropic_lines`` and ``gemini_lines``
(each dialect both ways; ``chat_convert`` what their chat conversions share), ``outcomes``
(what a result line means), ``batch_status`` (the statuses), ``retry`` (the one policy).
"""
