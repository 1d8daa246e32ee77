"""The eidetica-node process: command line, and (later) daemon, control API and TUI."""
