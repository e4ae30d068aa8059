"""What upstream systems use: a publishing client for lifecycle events, and
the file discovery behind `kbstream index` / `kbstream sync`."""
