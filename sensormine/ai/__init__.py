"""The metered AI client, schema generation and natural-language queries (the AI issue); empty until it lands."""
