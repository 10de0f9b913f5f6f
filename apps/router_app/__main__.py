"""Run the router application: ``python -m apps.router_app -i INPUT -o OUTPUT``."""

from apps.router_app.app import main

if __name__ == "__main__":
    main()
