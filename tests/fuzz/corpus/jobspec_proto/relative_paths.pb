

../model	
d.jsonl