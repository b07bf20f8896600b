"""What the tests share and that is no test itself: fixtures (the real backend and proxy, the
local hub, the session stores), the GGUF generator, the local hub and mirror servers, the
browser driver, recorded machines. Test modules import it as `support.<module>` (tests/ is
on sys.path through its conftest.py)."""
