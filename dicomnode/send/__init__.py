"""C-STORE SCU that delivers result objects to peers."""
