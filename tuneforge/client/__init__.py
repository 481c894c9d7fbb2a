"""The `tuneforge` client commands (`files`, `jobs`): a running service over HTTP. Imports no
database, worker or training code, so the client runs anywhere httpx does."""
