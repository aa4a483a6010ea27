from espmedsam.cli import app

app(prog_name="espmedsam")
