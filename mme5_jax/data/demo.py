"""`mme5 demo-data OUT_DIR`: a small, deterministic, multilingual image-text dataset in the record format.

Scenes are drawn procedurally from four attributes (shape, colour, position, count), so every caption is
exactly true and every hard negative differs from its positive in exactly one attribute. That makes the
set learnable by a tiny model on CPU in minutes while still exercising all 3 tasks and all 7 modality
combinations of mmE5's synthetic data, with captions and answers in 6 languages (instructions stay
English, as in mmE5). A third split of real photos from scikit-image and scikit-learn gives realistic
image sizes, aspect ratios and colour modes for tests.

Layout: OUT_DIR/{train,heldout,photos}/ each hold ArrayRecord shards, `images/` and `summary.json`;
image paths in the records are relative to the split directory.
"""
import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

from mme5_jax.records import ShardWriter

SHAPES = ("circle", "square", "triangle", "diamond")
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
           "yellow": (235, 200, 30), "purple": (140, 60, 180), "orange": (245, 130, 20)}
POSITIONS = {"left": (0.27, 0.5), "right": (0.73, 0.5), "top": (0.5, 0.27), "bottom": (0.5, 0.73),
             "center": (0.5, 0.5)}
COUNTS = (1, 2, 3)
ATTRIBUTES = {"shape": SHAPES, "colour": tuple(COLOURS), "position": tuple(POSITIONS), "count": COUNTS}
LANGUAGES = ("en", "de", "fr", "es", "it", "zh")
LANGUAGE_WEIGHTS = (3, 1, 1, 1, 1, 1)
LANGUAGE_NAMES = {"en": "English", "de": "German", "fr": "French", "es": "Spanish", "it": "Italian",
                  "zh": "Chinese"}

# Words per language. Shapes are (one <shape>, plural noun); all French/Spanish/Italian shape nouns are
# masculine, so the colour adjectives below agree with each of them.
_WORDS = {
    "en": {"shape": {"circle": ("one circle", "circles"), "square": ("one square", "squares"),
                     "triangle": ("one triangle", "triangles"), "diamond": ("one diamond", "diamonds")},
           "colour": {"red": "red", "green": "green", "blue": "blue", "yellow": "yellow", "purple": "purple",
                      "orange": "orange"},
           "position": {"left": "on the left", "right": "on the right", "top": "at the top",
                        "bottom": "at the bottom", "center": "in the centre"},
           "count": {1: "one", 2: "two", 3: "three"}},
    "de": {"shape": {"circle": ("ein Kreis", "Kreise"), "square": ("ein Quadrat", "Quadrate"),
                     "triangle": ("ein Dreieck", "Dreiecke"), "diamond": ("eine Raute", "Rauten")},
           "colour": {"red": "Rot", "green": "Grün", "blue": "Blau", "yellow": "Gelb", "purple": "Lila",
                      "orange": "Orange"},
           "position": {"left": "links", "right": "rechts", "top": "oben", "bottom": "unten",
                        "center": "in der Mitte"},
           "count": {1: "eins", 2: "zwei", 3: "drei"}},
    "fr": {"shape": {"circle": ("un cercle", "cercles"), "square": ("un carré", "carrés"),
                     "triangle": ("un triangle", "triangles"), "diamond": ("un losange", "losanges")},
           "colour": {"red": "rouge", "green": "vert", "blue": "bleu", "yellow": "jaune", "purple": "violet",
                      "orange": "orange"},
           "position": {"left": "à gauche", "right": "à droite", "top": "en haut", "bottom": "en bas",
                        "center": "au centre"},
           "count": {1: "un", 2: "deux", 3: "trois"}},
    "es": {"shape": {"circle": ("un círculo", "círculos"), "square": ("un cuadrado", "cuadrados"),
                     "triangle": ("un triángulo", "triángulos"), "diamond": ("un rombo", "rombos")},
           "colour": {"red": "rojo", "green": "verde", "blue": "azul", "yellow": "amarillo", "purple": "morado",
                      "orange": "naranja"},
           "position": {"left": "a la izquierda", "right": "a la derecha", "top": "arriba", "bottom": "abajo",
                        "center": "en el centro"},
           "count": {1: "uno", 2: "dos", 3: "tres"}},
    "it": {"shape": {"circle": ("un cerchio", "cerchi"), "square": ("un quadrato", "quadrati"),
                     "triangle": ("un triangolo", "triangoli"), "diamond": ("un rombo", "rombi")},
           "colour": {"red": "rosso", "green": "verde", "blue": "blu", "yellow": "giallo", "purple": "viola",
                      "orange": "arancione"},
           "position": {"left": "a sinistra", "right": "a destra", "top": "in alto", "bottom": "in basso",
                        "center": "al centro"},
           "count": {1: "uno", 2: "due", 3: "tre"}},
    "zh": {"shape": {"circle": ("一个圆形", "圆形"), "square": ("一个正方形", "正方形"),
                     "triangle": ("一个三角形", "三角形"), "diamond": ("一个菱形", "菱形")},
           "colour": {"red": "红色", "green": "绿色", "blue": "蓝色", "yellow": "黄色", "purple": "紫色",
                      "orange": "橙色"},
           "position": {"left": "左边", "right": "右边", "top": "上方", "bottom": "下方", "center": "中间"},
           "count": {1: "一个", 2: "两个", 3: "三个"}},
}

# Templates take the localised words; `objects` is "<count> <shape>" with the right number.
_CAPTION = {
    "en": "{count_word} {colour} {shape_plural} {position}",
    "de": "{objects} in {colour} {position}",
    "fr": "{objects} de couleur {colour} {position}",
    "es": "{objects} de color {colour} {position}",
    "it": "{objects} di colore {colour} {position}",
    "zh": "{position}有{count_word}{colour}的{shape_plural}",
}
_LABEL = {"en": "{colour} {shape}", "de": "{shape} in {colour}", "fr": "{shape} {colour}", "es": "{shape} {colour}",
          "it": "{shape} {colour}", "zh": "{colour}{shape}"}
_QUESTION = {
    "en": {"count": "How many shapes are there?", "colour": "What colour are the shapes?",
           "shape": "What kind of shape is shown?", "position": "Where are the shapes?"},
    "de": {"count": "Wie viele Formen gibt es?", "colour": "Welche Farbe haben die Formen?",
           "shape": "Welche Form ist zu sehen?", "position": "Wo sind die Formen?"},
    "fr": {"count": "Combien de formes y a-t-il ?", "colour": "De quelle couleur sont les formes ?",
           "shape": "Quelle forme voit-on ?", "position": "Où sont les formes ?"},
    "es": {"count": "¿Cuántas figuras hay?", "colour": "¿De qué color son las figuras?",
           "shape": "¿Qué figura se ve?", "position": "¿Dónde están las figuras?"},
    "it": {"count": "Quante forme ci sono?", "colour": "Di che colore sono le forme?",
           "shape": "Quale forma si vede?", "position": "Dove sono le forme?"},
    "zh": {"count": "有几个图形？", "colour": "图形是什么颜色？", "shape": "图中是什么形状？",
           "position": "图形在哪里？"},
}
_EDIT = {
    "en": {"colour": "Make the shapes {value}.", "shape": "Turn them into {value}.", "position": "Move them {value}.",
           "count": "Show {value} of them."},
    "de": {"colour": "Färbe die Formen in {value}.", "shape": "Mach daraus {value}.",
           "position": "Verschiebe sie nach {value}.", "count": "Zeige {value} davon."},
    "fr": {"colour": "Rends les formes {value}.", "shape": "Transforme-les en {value}.",
           "position": "Déplace-les {value}.", "count": "Montres-en {value}."},
    "es": {"colour": "Pon las figuras de color {value}.", "shape": "Conviértelas en {value}.",
           "position": "Muévelas {value}.", "count": "Muestra {value}."},
    "it": {"colour": "Colora le forme di {value}.", "shape": "Trasformale in {value}.",
           "position": "Spostale {value}.", "count": "Mostrane {value}."},
    "zh": {"colour": "把图形变成{value}。", "shape": "把它们变成{value}。", "position": "把它们移到{value}。",
           "count": "显示{value}。"},
}

# (task, modality, weight): classification : VQA : retrieval = 1 : 1 : 2, as in mmE5's synthetic data.
SCHEDULE = (
    [("classification", "I->T", 7), ("classification", "IT->T", 7), ("vqa", "IT->T", 14)]
    + [("retrieval", m, 4) for m in ("I->T", "IT->T", "T->IT", "T->I", "I->I", "IT->I", "IT->IT")]
)
NUM_NEGATIVES = 3

_PHOTOS = {  # name -> caption per language; loaded from skimage.data / sklearn sample images
    "astronaut": ("an astronaut in a space suit", "eine Astronautin im Raumanzug", "une astronaute en combinaison",
                  "una astronauta con traje espacial", "un'astronauta in tuta spaziale", "穿着宇航服的宇航员"),
    "coffee": ("a cup of coffee", "eine Tasse Kaffee", "une tasse de café", "una taza de café",
               "una tazza di caffè", "一杯咖啡"),
    "chelsea": ("a tabby cat", "eine getigerte Katze", "un chat tigré", "un gato atigrado", "un gatto tigrato",
                "一只虎斑猫"),
    "rocket": ("a rocket on the launch pad", "eine Rakete auf der Startrampe", "une fusée sur le pas de tir",
               "un cohete en la plataforma", "un razzo sulla rampa di lancio", "发射台上的火箭"),
    "camera": ("a man with a camera", "ein Mann mit einer Kamera", "un homme avec un appareil photo",
               "un hombre con una cámara", "un uomo con una macchina fotografica", "拿着相机的男人"),
    "coins": ("old coins", "alte Münzen", "de vieilles pièces", "monedas antiguas", "monete antiche", "古老的硬币"),
    "moon": ("the surface of the moon", "die Mondoberfläche", "la surface de la lune", "la superficie de la luna",
             "la superficie della luna", "月球表面"),
    "hubble_deep_field": ("galaxies in deep space", "Galaxien im tiefen All", "des galaxies dans l'espace lointain",
                          "galaxias en el espacio profundo", "galassie nello spazio profondo", "深空中的星系"),
    "immunohistochemistry": ("stained tissue under a microscope", "gefärbtes Gewebe unter dem Mikroskop",
                             "un tissu coloré au microscope", "tejido teñido al microscopio",
                             "tessuto colorato al microscopio", "显微镜下的染色组织"),
    "colorwheel": ("a colour wheel", "ein Farbkreis", "un cercle chromatique", "una rueda de colores",
                   "una ruota dei colori", "色轮"),
    "logo": ("a logo on a transparent background", "ein Logo auf transparentem Hintergrund",
             "un logo sur fond transparent", "un logotipo sobre fondo transparente",
             "un logo su sfondo trasparente", "透明背景上的标志"),
    "china.jpg": ("a temple in China", "ein Tempel in China", "un temple en Chine", "un templo en China",
                  "un tempio in Cina", "中国的一座寺庙"),
    "flower.jpg": ("a flower in bloom", "eine blühende Blume", "une fleur épanouie", "una flor abierta",
                   "un fiore sbocciato", "盛开的花"),
}


def caption(scene, language):
    words = _WORDS[language]
    one, plural = words["shape"][scene["shape"]]
    count_word = words["count"][scene["count"]]
    objects = one if scene["count"] == 1 else f"{count_word} {plural}"
    shape_plural = plural if scene["count"] > 1 else _shape_noun(scene["shape"], language)
    return _CAPTION[language].format(count_word=count_word, objects=objects, colour=words["colour"][scene["colour"]],
                                     shape_plural=shape_plural, position=words["position"][scene["position"]])


def _shape_noun(shape, language):
    one, plural = _WORDS[language]["shape"][shape]
    return one.split()[-1] if " " in one else plural


def label(scene, language):
    return _LABEL[language].format(colour=_WORDS[language]["colour"][scene["colour"]],
                                   shape=_shape_noun(scene["shape"], language))


def attribute_word(attribute, value, language):
    words = _WORDS[language][attribute][value]
    return words[1] if attribute == "shape" else words


def scene_key(scene, variant):
    return f"{scene['shape']}-{scene['colour']}-{scene['position']}-{scene['count']}-v{variant}"


def render_scene(scene, variant, size, seed):
    """Draw the scene; `variant` changes background and jitter but never an attribute."""
    rng = random.Random(f"{seed}/{scene_key(scene, variant)}")
    background = tuple(rng.randint(240, 255) for _ in range(3))
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    cx, cy = POSITIONS[scene["position"]]
    radius = size * 0.11
    spread = size * 0.28
    horizontal = scene["position"] in ("top", "bottom", "center")
    for i in range(scene["count"]):
        offset = (i - (scene["count"] - 1) / 2) * spread
        x = cx * size + (offset if horizontal else 0) + rng.uniform(-1.5, 1.5)
        y = cy * size + (0 if horizontal else offset) + rng.uniform(-1.5, 1.5)
        r = radius * rng.uniform(0.9, 1.1)
        colour = COLOURS[scene["colour"]]
        if scene["shape"] == "circle":
            draw.ellipse([x - r, y - r, x + r, y + r], fill=colour)
        elif scene["shape"] == "square":
            draw.rectangle([x - r, y - r, x + r, y + r], fill=colour)
        elif scene["shape"] == "triangle":
            draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=colour)
        else:
            draw.polygon([(x, y - r * 1.2), (x + r, y), (x, y + r * 1.2), (x - r, y)], fill=colour)
    return image


def change_one(scene, rng, attributes=tuple(ATTRIBUTES)):
    """A copy of `scene` with exactly one of `attributes` changed."""
    attribute = rng.choice(attributes)
    value = rng.choice([v for v in ATTRIBUTES[attribute] if v != scene[attribute]])
    return {**scene, attribute: value}


def one_attribute_negatives(scene, rng, attributes=tuple(ATTRIBUTES), count=NUM_NEGATIVES):
    """Distinct scenes that each differ from `scene` in exactly one of `attributes`."""
    negatives = []
    options = sum(len(ATTRIBUTES[a]) - 1 for a in attributes)
    while len(negatives) < min(count, options):
        candidate = change_one(scene, rng, attributes)
        if candidate not in negatives:
            negatives.append(candidate)
    return negatives


class _ImagePool:
    """Renders each (scene, variant) once into the split's `images/` directory."""

    def __init__(self, split_dir, size, seed):
        self.split_dir, self.size, self.seed = split_dir, size, seed
        (split_dir / "images").mkdir(parents=True, exist_ok=True)
        self.written = set()

    def path(self, scene, variant=0):
        relative = f"images/{scene_key(scene, variant)}.png"
        if relative not in self.written:
            render_scene(scene, variant, self.size, self.seed).save(self.split_dir / relative, optimize=False)
            self.written.add(relative)
        return relative


def _scene_record(index, split, rng, pool, task, modality, language):
    scene = {a: rng.choice(v) for a, v in ATTRIBUTES.items()}
    meta = {"scene": scene}
    qry_image = None if modality.startswith("T->") else pool.path(scene)
    pos_image = None
    neg_scenes = one_attribute_negatives(scene, rng)
    if task == "classification":
        if modality == "I->T":
            qry_text = ("Represent the given image for classification. "
                        f"Answer with a {LANGUAGE_NAMES[language]} label.\n")
            neg_scenes = one_attribute_negatives(scene, rng, ("colour", "shape"))
            pos_text, neg_text = label(scene, language), [label(s, language) for s in neg_scenes]
        else:
            attribute = rng.choice(("colour", "shape"))
            qry_text = (f"Classify the {attribute} of the shapes in the given image. "
                        f"Answer in {LANGUAGE_NAMES[language]}.\n")
            neg_scenes = one_attribute_negatives(scene, rng, (attribute,))
            pos_text = attribute_word(attribute, scene[attribute], language)
            neg_text = [attribute_word(attribute, s[attribute], language) for s in neg_scenes]
        neg_image = [None] * len(neg_text)
    elif task == "vqa":
        attribute = rng.choice(tuple(ATTRIBUTES))
        qry_text = f"Represent the given image with the following question: {_QUESTION[language][attribute]}\n"
        neg_scenes = one_attribute_negatives(scene, rng, (attribute,))
        pos_text = attribute_word(attribute, scene[attribute], language)
        neg_text = [attribute_word(attribute, s[attribute], language) for s in neg_scenes]
        neg_image = [None] * len(neg_text)
    elif modality in ("I->T", "IT->T"):
        qry_text = ("Find a caption describing the given image.\n" if modality == "I->T" else
                    f"Find the {LANGUAGE_NAMES[language]} caption that describes the given image.\n")
        pos_text, neg_text = caption(scene, language), [caption(s, language) for s in neg_scenes]
        neg_image = [None] * len(neg_text)
    elif modality in ("T->I", "T->IT"):
        qry_text = f"Find me an image that matches the given caption: {caption(scene, language)}\n"
        pos_image, neg_image = pool.path(scene, 1), [pool.path(s, 1) for s in neg_scenes]
        if modality == "T->I":
            pos_text, neg_text = "Represent the given image.\n", ["Represent the given image.\n"] * len(neg_scenes)
        else:
            pos_text = f"Represent the given image with its shape: {attribute_word('shape', scene['shape'], language)}"
            neg_text = [f"Represent the given image with its shape: {attribute_word('shape', s['shape'], language)}"
                        for s in neg_scenes]
    elif modality == "I->I":
        qry_text = "Find an image showing the same scene as the given image.\n"
        pos_image, neg_image = pool.path(scene, 1), [pool.path(s, 1) for s in neg_scenes]
        pos_text, neg_text = "Represent the given image.\n", ["Represent the given image.\n"] * len(neg_scenes)
    else:  # IT->I and IT->IT: an edit instruction in the caption language, like CIRR
        attribute = rng.choice(tuple(ATTRIBUTES))
        target = change_one(scene, rng, (attribute,))
        edit = _EDIT[language][attribute].format(value=attribute_word(attribute, target[attribute], language))
        qry_text = f"Retrieve the image that results from this change to the given image: {edit}\n"
        neg_scenes = [scene] + [s for s in one_attribute_negatives(target, rng) if s != scene][:NUM_NEGATIVES - 1]
        meta = {"scene": target, "source_scene": scene}
        pos_image, neg_image = pool.path(target, 1), [pool.path(s, 1) for s in neg_scenes]
        if modality == "IT->I":
            pos_text, neg_text = "Represent the given image.\n", ["Represent the given image.\n"] * len(neg_scenes)
        else:
            pos_text, neg_text = caption(target, language), [caption(s, language) for s in neg_scenes]
    meta["neg_scenes"] = neg_scenes
    return {"id": f"demo-{split}-{index:06d}", "source": "demo-shapes", "task": task, "modality": modality,
            "language": language, "qry_text": qry_text, "qry_image": qry_image, "pos_text": pos_text,
            "pos_image": pos_image, "neg_text": neg_text, "neg_image": neg_image, "meta": meta}


def _schedule(num_records, rng):
    pairs = [(task, modality) for task, modality, weight in SCHEDULE for _ in range(weight)]
    order = []
    while len(order) < num_records:
        block = list(pairs)
        rng.shuffle(block)
        order.extend(block)
    return order[:num_records]


def _write_summary(split_dir, records, extra):
    counts = {}
    for key in ("task", "modality", "language"):
        counts[key] = {}
        for record in records:
            counts[key][record[key]] = counts[key].get(record[key], 0) + 1
    summary = {"generator": "mme5 demo-data", "num_records": len(records), "image_root": ".", "counts": counts, **extra}
    (split_dir / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False, sort_keys=True) + "\n",
                                            encoding="utf-8")


def write_scene_split(split_dir, split, num_records, image_size, seed, records_per_shard):
    split_dir = Path(split_dir)
    rng = random.Random(f"demo/{seed}/{split}")
    pool = _ImagePool(split_dir, image_size, seed=f"{seed}/{split}")
    records = []
    with ShardWriter(split_dir, records_per_shard=records_per_shard) as writer:
        for index, (task, modality) in enumerate(_schedule(num_records, rng)):
            language = rng.choices(LANGUAGES, weights=LANGUAGE_WEIGHTS)[0]
            record = _scene_record(index, split, rng, pool, task, modality, language)
            writer.write(record)
            records.append(record)
    _write_summary(split_dir, records, {"seed": seed, "split": split, "image_size": image_size})
    return split_dir


def load_photos():
    """The real photos that ship inside scikit-image and scikit-learn, as PIL images in their own modes."""
    import skimage.data
    from sklearn.datasets import load_sample_images

    photos = {}
    for name in _PHOTOS:
        if name.endswith(".jpg"):
            continue
        array = getattr(skimage.data, name)()
        photos[name] = Image.fromarray(array)
    sample = load_sample_images()
    for filename, array in zip(sample.filenames, sample.images):
        photos[Path(filename).name] = Image.fromarray(array)
    return photos


def write_photo_split(split_dir, max_side, seed, records_per_shard):
    """Text->photo and crop->photo retrieval over real photos, negatives being the other photos."""
    split_dir = Path(split_dir)
    (split_dir / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"demo/{seed}/photos")
    names, paths, crops = sorted(_PHOTOS), {}, {}
    for name, photo in sorted(load_photos().items()):
        photo = photo.copy()
        photo.thumbnail((max_side, max_side), Image.BICUBIC)
        stem = Path(name).stem
        suffix = ".png" if photo.mode in ("RGBA", "L", "1") else ".jpg"
        paths[name] = f"images/{stem}{suffix}"
        photo.save(split_dir / paths[name])
        w, h = photo.size
        crop = photo.crop((w // 8, h // 8, w - w // 8, h - h // 8)).convert("RGB")
        crops[name] = f"images/{stem}-crop.jpg"
        crop.save(split_dir / crops[name], quality=90)
    records = []
    with ShardWriter(split_dir, records_per_shard=records_per_shard) as writer:
        for name in names:
            others = rng.sample([n for n in names if n != name], NUM_NEGATIVES)
            for li, language in enumerate(LANGUAGES):
                records.append({
                    "id": f"demo-photos-{Path(name).stem}-{language}", "source": "demo-photos", "task": "retrieval",
                    "modality": "T->I", "language": language,
                    "qry_text": f"Find me an everyday image that matches the given caption: {_PHOTOS[name][li]}\n",
                    "qry_image": None, "pos_text": "Represent the given image.\n", "pos_image": paths[name],
                    "neg_text": ["Represent the given image.\n"] * NUM_NEGATIVES,
                    "neg_image": [paths[o] for o in others], "meta": {"photo": name}})
            records.append({
                "id": f"demo-photos-{Path(name).stem}-crop", "source": "demo-photos", "task": "retrieval",
                "modality": "I->I", "language": "en",
                "qry_text": "Find the full photo that the given image was cropped from.\n", "qry_image": crops[name],
                "pos_text": "Represent the given image.\n", "pos_image": paths[name],
                "neg_text": ["Represent the given image.\n"] * NUM_NEGATIVES,
                "neg_image": [paths[o] for o in others], "meta": {"photo": name}})
        for record in records:
            writer.write(record)
    _write_summary(split_dir, records, {"seed": seed, "split": "photos", "max_side": max_side})
    return split_dir


def build_demo_dataset(out_dir, num_train=4096, num_heldout=512, image_size=64, seed=0, photos=True,
                       records_per_shard=1024):
    """Write the demo splits under `out_dir` and return {split: directory}."""
    out_dir = Path(out_dir)
    splits = {"train": write_scene_split(out_dir / "train", "train", num_train, image_size, seed, records_per_shard),
              "heldout": write_scene_split(out_dir / "heldout", "heldout", num_heldout, image_size, seed,
                                           records_per_shard)}
    if photos:
        splits["photos"] = write_photo_split(out_dir / "photos", max_side=112, seed=seed,
                                             records_per_shard=records_per_shard)
    return splits


def add_arguments(parser):
    parser.add_argument("out_dir", metavar="OUT_DIR", help="directory to create; gets train/, heldout/ and photos/")
    parser.add_argument("--num-train", type=int, default=4096, help="records in the train split (default 4096)")
    parser.add_argument("--num-heldout", type=int, default=512, help="records in the held-out split (default 512)")
    parser.add_argument("--image-size", type=int, default=64, help="side of the square scene images in px (default 64)")
    parser.add_argument("--seed", type=int, default=0, help="same seed, same bytes (default 0)")
    parser.add_argument("--no-photos", action="store_true", help="skip the split of real photos")


def run(args):
    splits = build_demo_dataset(args.out_dir, num_train=args.num_train, num_heldout=args.num_heldout,
                                image_size=args.image_size, seed=args.seed, photos=not args.no_photos)
    for split, path in splits.items():
        summary = json.loads((path / "summary.json").read_text(encoding="utf-8"))
        print(f"{split}: {summary['num_records']} records in {path}")
    return 0
