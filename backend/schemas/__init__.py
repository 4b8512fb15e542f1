"""HTTP models; nothing else lives here."""
