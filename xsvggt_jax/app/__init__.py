"""The applications: the command line and the viewer."""
