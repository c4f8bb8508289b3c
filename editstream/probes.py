"""Built-in locality probes: everyday prompts unrelated to any edit, with reference continuations."""

LOCALITY_POOL: tuple[tuple[str, str], ...] = (
    ("Water boils at a temperature of", "100 degrees"),
    ("The opposite of hot is", "cold"),
    ("A week has seven", "days"),
    ("The largest planet in the solar system is", "Jupiter"),
    ("Two plus two equals", "four"),
    ("The color of a clear daytime sky is", "blue"),
    ("Bees make", "honey"),
    ("The chemical symbol for gold is", "Au"),
    ("Shakespeare wrote the play", "Hamlet"),
    ("The first month of the year is", "January"),
    ("Ice is frozen", "water"),
    ("A triangle has three", "sides"),
    ("The author of the theory of relativity is", "Albert Einstein"),
    ("The freezing point of water is", "0 degrees"),
    ("Cows drink", "water"),
    ("The heart pumps", "blood"),
)
