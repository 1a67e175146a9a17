"""The SCP: association policy and thin C-ECHO / C-STORE handlers."""
