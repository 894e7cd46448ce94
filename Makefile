.PHONY: demo test bench env
demo:
	python3 dev.py demo
test:
	python3 dev.py test
bench:
	python3 dev.py bench
env:
	python3 dev.py env
