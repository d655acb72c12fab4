"""The studio from the shell: batch clones and edits of files and folders (``python -m cli``).

``batch`` owns the commands; they use the same engine choice, settings and prompt cache as the
server, so a voice prepared by one is a cache hit for the other.
"""
