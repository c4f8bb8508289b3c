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

# Short unrelated sentences, prepended to a fact's prompt to make cheap paraphrase-like variants.
PREFIXES: tuple[str, ...] = (
    "Here is a question.",
    "The weather was mild that day.",
    "I read about this in a book.",
    "Everyone knows the answer.",
    "She opened the window and sat down.",
    "This was mentioned in the news.",
    "Let me tell you something.",
    "The train left on time.",
)

# Everyday subjects, swapped into a fact's prompt to make hard negatives (same relation, other subject).
SUBJECTS: tuple[str, ...] = (
    "Paris",
    "London",
    "Tokyo",
    "Germany",
    "Brazil",
    "Canada",
    "India",
    "Egypt",
    "Microsoft",
    "Toyota",
    "Nokia",
    "BBC",
    "Apple",
    "Google",
    "Albert Einstein",
    "Marie Curie",
    "Barack Obama",
    "Pablo Picasso",
    "Lionel Messi",
    "Taylor Swift",
    "William Shakespeare",
    "Isaac Newton",
    "Mount Everest",
    "the Nile",
    "the Eiffel Tower",
    "the Amazon",
    "Harvard University",
    "Real Madrid",
    "the Beatles",
    "Mozart",
    "Charles Darwin",
    "Leonardo da Vinci",
    "Sweden",
    "Italy",
    "Mexico",
    "Nairobi",
    "Sydney",
    "Moscow",
    "Intel",
    "Sony",
)

# General prompts that no edit should change: training negatives for routers (SCEN's neurons). They
# are disjoint from every evaluation probe (LOCALITY_POOL, SUBJECT_PROBES, the demo facts), so what
# the evaluators measure was never trained on (tests/test_probes.py).
GENERAL_PROMPTS: tuple[str, ...] = (
    "The best way to learn a language is",
    "My favourite food is",
    "In the morning I usually",
    "The capital of Spain is",
    "The tallest mountain on Earth is",
    "The main ingredient of bread is",
    "A good night's sleep helps you",
    "The sun rises in the",
    "Computers store data in",
    "The president of the United States lives in the",
    "The number after nine is",
    "A year has twelve",
    "The boiling point of milk is",
    "Snow is usually",
    "Most birds can",
    "Cats are known for",
    "The Pacific Ocean is the",
    "Football is played with a",
    "The currency of Mexico is the",
    "Photosynthesis turns sunlight into",
    "The language spoken in Brazil is",
    "A doctor works in a",
    "The speed of light is about",
    "Rain falls from",
    "Q: What is the capital of Italy? A:",
    "Q: Who painted the Mona Lisa? A:",
    "Q: What is the largest ocean? A:",
    "Q: How many legs does a spider have? A:",
)

# Other things one can say about a subject ("{}" is the subject): an expert is trained to leave the
# model's next word after these unchanged, so an edit of one relation does not take over the others.
SUBJECT_CONTEXTS: tuple[str, ...] = (
    "The history of {}",
    "A photograph of {}",
    "Here is a short biography of {}:",
)

# Held-out prompts about an edited subject that ask for something other than the edited relation
# (none is used in training): the quality benchmark's subject-locality probes, teacher-forced on the
# edit's target, so an edit that leaks its target into every sentence about the subject scores low.
SUBJECT_PROBES: tuple[str, ...] = (
    "{} is famous for",
    "Tell me about {}.",
    "The story of {} began in",
    "Most people know {} as",
)
