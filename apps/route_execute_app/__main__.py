"""Run the route -> execute application: ``python -m apps.route_execute_app -i INPUT -o OUTPUT -m MODELS``."""

from apps.route_execute_app.app import main

if __name__ == "__main__":
    main()
