"""Shipped class lists (one name per line, line i = label i) and the m2clip-tiny / m2clip-demo open_clip configs.

``kinetics600_new220.txt``: the 220 Kinetics-600 classes that are not in Kinetics-400, the class set of the
K600 zero-shot protocol, in Kinetics-600's (alphabetical) order. Source: the Kinetics-600 class list of
X-CLIP and ViFi-CLIP (``labels/kinetics_600_labels.csv`` in github.com/microsoft/VideoX, folder X-CLIP, and
github.com/muzairkhattak/ViFi-CLIP), less the classes of ``kinetics400.txt`` (compared without case and
punctuation), less 11 Kinetics-400 classes that Kinetics-600 renamed (K600 name <- K400 name): changing wheel
(not on bike) <- changing wheel, cooking sausages (not on barbeque) <- cooking sausages, dyeing hair <- dying
hair, hugging (not baby) <- hugging, inflating balloons <- balloon blowing, making the bed <- making bed,
opening bottle (not wine) <- opening bottle, person collecting garbage <- garbage collecting, throwing ball
(not baseball or American football) <- throwing ball, tying necktie <- tying tie, waking up <- baby waking up.
Checked against the benchmark's origin, ER-ZSAR (Chen and Huang, ICCV 2021; github.com/DeLightCMU/
ElaborativeRehearsal, ``datasets/Kinetics/zsl220/val_class_idxs.json``, classes numbered 400-619 in this
order): for each of its three splits, the 220 classes less that split's 60 validation classes are exactly
the 160 classes of ViFi-CLIP's ``labels/ZS_split{N}_K600.csv``.
"""
