"""File I/O that never leaves half a file behind (``atomic``) and directories one process owns at a time
(``locking``)."""
