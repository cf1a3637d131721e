"""The web console (``trioclone console``): the map in a browser.

The console is a Trio client of the servers (``open_client``) with an ASGI
app (Starlette, served by Hypercorn's Trio worker) in the same process.
``listing`` and ``feed`` are pure: what a page shows of the map, and the
batches of changes pushed to pages; ``app`` is the HTTP surface, and
``serve`` runs the client, the app and the tasks that feed the pages.
"""
