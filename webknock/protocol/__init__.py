"""Wire protocol v1 of the original Web Knocker Firewall Service.

`transport` (no crypto import) screens the HTTP field cheaply; `v1` holds the
packet codec; `messages` parses and builds the JSON requests and replies.
"""
