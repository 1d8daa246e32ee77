"""The eidetica-node process: the daemon (storage, sync engine, transports), its control API
over a unix socket (``service`` answers, ``api`` types the answers, ``control`` serves
them), and the clients of that API: the command line (``cli``, ``render``) and the TUI."""
