#!/usr/bin/python3
"""CGI entry point; install.sh rewrites the interpreter line to the venv's python."""
import sys

from webknock.cgi import main

sys.exit(main())
