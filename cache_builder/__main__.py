import sys

# The import stays inside the guard: the build's regressor processes are spawned, and spawn
# imports this module again in each of them, which should then cost nothing.
if __name__ == "__main__":
    from cache_builder.cli import main

    sys.exit(main())
