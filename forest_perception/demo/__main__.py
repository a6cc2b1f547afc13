"""``python -m forest_perception.demo``."""

from forest_perception.demo.main import main

if __name__ == "__main__":
    raise SystemExit(main())
