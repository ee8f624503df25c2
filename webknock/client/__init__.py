"""The webknock client: knock, keep a grant alive, run a command behind a knock, show info.

Only this package imports `requests`; nothing the CGI or the daemon imports depends on it.
"""
