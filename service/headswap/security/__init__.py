"""Access control that knows nothing of the transport: credentials, scopes, who a caller is."""
