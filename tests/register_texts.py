"""Fixed English sentences of several registers, written for the tests (in no training text): the default model's
fidelity to its teacher (test_default_model) and each precision's fidelity to float32 (test_precision)."""

# A few per register the model card evaluates.
REGISTERS = {
    "social": [
        "omg this coffee shop just gave me a free muffin, best monday ever!!",
        "cant believe the game got cancelled again smh",
        "anyone else still awake? my brain refuses to shut off tonight lol",
        "new haircut, who dis",
    ],
    "product review": [
        "The battery lasts two days and the screen is bright, but the case scratches easily.",
        "Stopped working after a week. Returned it and bought a different brand.",
        "Great value for the price; the blender crushes ice without any trouble.",
        "The instructions were confusing and two screws were missing from the box.",
    ],
    "question": [
        "How do I reset my password if I no longer have access to my old email address?",
        "What is the difference between a virus and a bacterium?",
        "Can I bring a laptop in my carry-on bag on international flights?",
        "Why does the moon look bigger near the horizon?",
    ],
    "technical": [
        "Set the environment variable before starting the server, or the default port is used.",
        "The function returns None when the key is missing instead of raising an exception.",
        "Run the migration script once after upgrading the database schema.",
        "Each worker thread holds its own connection from the pool until the request completes.",
    ],
    "news": [
        "The city council approved a new budget that increases funding for public transport.",
        "Thousands of residents were evacuated as the wildfire spread towards the coast.",
        "The company reported higher quarterly profits despite weaker sales in Europe.",
        "Officials said the bridge will remain closed for repairs until next spring.",
    ],
    "fiction": [
        "She closed the letter without reading the last line, afraid of what it might say.",
        "The old house creaked in the wind as if it remembered every storm.",
        "He counted the steps to the door twice before he dared to knock.",
        "Somewhere below, a dog barked once and the whole village fell silent.",
    ],
}
